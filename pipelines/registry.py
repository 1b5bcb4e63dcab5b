"""The one shared adapter layer: artifact store, adapter index and MLflow model registry.

``pipelines`` (publishing adapters after personalization) and ``serving`` (resolving and loading
them per request) both import this module; nothing here imports Ray or torch, and MLflow is
imported only when a :class:`ModelRegistry` first talks to it: serving builds the registry without
a tracking URI (``AdapterRegistry.from_urls(store, None, index)``) and never touches MLflow.

Three places hold an adapter, each behind a URL:

- **store** (:class:`ArtifactStore`, any fsspec URL, local directory by default): the files,
  ``{store}/{tenant}/{identity}/{job_key}/adapter.safetensors`` and ``adapter.json``. Uploads go
  to a temporary key, are read back and sha256-verified, and only then moved into place.
- **registry** (:class:`ModelRegistry`, MLflow; SQLite by default, any tracking URI): one
  registered model per person, ``pfstorer.{tenant}.{identity}``; each version's source is the
  store URI, its tags carry the lineage; alias ``prod`` points at the newest version. A run per
  job (experiment ``pfstorer/{tenant}``) holds params, the loss curve and metrics.
- **index** (:class:`AdapterIndex`, one Parquet file at a URL): (tenant, identity) -> (version,
  uri, sha256, base fingerprint, job key). Serving reads only this, so MLflow stays off the
  request path. Writes replace the file atomically; readers notice a change by its size/mtime/ETag.

:class:`AdapterRegistry` ties them together: ``publish`` (idempotent by job key, write -> verify
-> register -> index), ``resolve``, ``fetch`` (sha256-verified, cached) and ``forget`` (faces are
biometric data: removes the index row, the registered model and its runs, and the files).

Keys: tenants match ``[A-Za-z0-9][A-Za-z0-9_-]{0,63}`` (no dots, so the registered model name
``pfstorer.{tenant}.{identity}`` is unambiguous); identities match
``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` without ``..``. Serving's multiplexed model id is
``tenant/identity`` (:func:`model_key`).

Concurrency: the registry retries transient database errors (SQLite locks); the index is
read-modify-write, guarded by a file lock on local paths. On object stores, keep one index writer
(the pipeline driver publishes; workers only train) - a PUT is atomic, two racing writers are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pfstorer.errors import AdapterError, PFStorerError

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_JSON",
    "adapter_tags",
    "ADAPTER_TENSORS",
    "PROD_ALIAS",
    "AdapterIndex",
    "AdapterRegistry",
    "ArtifactStore",
    "ForgetReport",
    "INDEX_SCHEMA",
    "IndexEntry",
    "ModelRegistry",
    "ModelVersionInfo",
    "check_key",
    "default_storage_options",
    "is_safe_key",
    "job_key",
    "local_defaults",
    "model_key",
    "model_name",
    "parse_model_key",
    "sha256_file",
]

ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"
ADAPTER_FILES = (ADAPTER_TENSORS, ADAPTER_JSON)
PROD_ALIAS = "prod"
MODEL_PREFIX = "pfstorer"
DEFAULT_STATE_DIR = ".pfstorer-state"
_CHUNK = 8 * 1024 * 1024

# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------

IDENTITY_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TENANT_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
JOB_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def is_safe_key(value: object, kind: str = "identity") -> bool:
    """True if ``value`` can be a path segment, an MLflow name part and a multiplex id part.

    ``kind`` is ``"identity"`` (letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit;
    at most 128 characters; no ``..``) or ``"tenant"`` (the same without ``.``, at most 64).
    """
    if not isinstance(value, str):
        return False
    if kind == "tenant":
        return bool(TENANT_KEY_RE.match(value))
    return bool(IDENTITY_KEY_RE.match(value)) and ".." not in value


def check_key(value: object, kind: str = "identity") -> str:
    """Return ``value`` if :func:`is_safe_key`, else raise :class:`PFStorerError`."""
    if not is_safe_key(value, kind):
        rule = (
            "letters, digits, '_' and '-', starting with a letter or digit, at most 64"
            if kind == "tenant"
            else "letters, digits, '.', '_' and '-', starting with a letter or digit, no '..', "
            "at most 128"
        )
        raise PFStorerError(f"{kind} {value!r} is not a safe key ({rule})")
    return value  # type: ignore[return-value]


def model_key(tenant: str, identity: str) -> str:
    """Serving's multiplexed model id for a person: ``tenant/identity``."""
    return f"{check_key(tenant, 'tenant')}/{check_key(identity)}"


def parse_model_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`model_key`; raises :class:`PFStorerError` for anything else."""
    tenant, sep, identity = (key or "").partition("/")
    if not sep:
        raise PFStorerError(f"model key {key!r} is not 'tenant/identity'")
    return check_key(tenant, "tenant"), check_key(identity)


def model_name(tenant: str, identity: str) -> str:
    """The registered model of one person: ``pfstorer.{tenant}.{identity}``."""
    return f"{MODEL_PREFIX}.{check_key(tenant, 'tenant')}.{check_key(identity)}"


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def job_key(rows_sha256s: Iterable[str], base_fingerprint: str, config: Mapping[str, Any]) -> str:
    """Idempotency key of one personalization job (32 hex characters).

    A hash of the person's reference photos (their content sha256s, order-independent: renaming
    or reordering files does not retrain), the base model fingerprint and the training config.
    """
    payload = {
        "refs": sorted(str(s) for s in rows_sha256s),
        "base": str(base_fingerprint),
        "config": dict(config),
    }
    return hashlib.sha256(_canonical_json(payload).encode()).hexdigest()[:32]


def sha256_file(path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None) -> str:
    """sha256 hex of a file's bytes, streamed (local path, or a path on ``fs``)."""
    h = hashlib.sha256()
    opener = fs.open(path, "rb") if fs is not None else open(path, "rb")
    with opener as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# fsspec helpers
# ---------------------------------------------------------------------------------------------

_LOCAL_PROTOCOLS = {"file", "local"}


def default_storage_options(url: str) -> dict[str, Any]:
    """Storage options from the environment for ``url``.

    For ``s3://`` URLs: an endpoint from ``PFSTORER_S3_ENDPOINT_URL``, ``MLFLOW_S3_ENDPOINT_URL``
    or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (e.g. a MinIO or moto server). Credentials come
    from the usual AWS variables through s3fs/botocore. Other protocols: none.
    """
    if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
        for var in (
            "PFSTORER_S3_ENDPOINT_URL",
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL",
        ):
            if os.environ.get(var):
                return {"endpoint_url": os.environ[var]}
    return {}


def is_local_url(url: str) -> bool:
    return fsspec.utils.get_protocol(str(url)) in _LOCAL_PROTOCOLS


def url_to_fs(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; ``storage_options`` apply to remote protocols only.

    ``None`` means :func:`default_storage_options`.
    """
    url = os.fspath(url)
    if is_local_url(url):
        return fsspec.core.url_to_fs(url)
    opts = default_storage_options(url) if storage_options is None else dict(storage_options)
    return fsspec.core.url_to_fs(url, **opts)


def _invalidate(fs: fsspec.AbstractFileSystem, path: str | None = None) -> None:
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


# ---------------------------------------------------------------------------------------------
# artifact store
# ---------------------------------------------------------------------------------------------


def adapter_tags(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The lineage an adapter's own metadata gives its registered version (base, config, losses)."""
    return {
        "base_fingerprint": meta.get("base_fingerprint"),
        "format_version": meta.get("format_version"),
        "config": meta.get("config"),
        "metrics": meta.get("final_losses"),
        "steps": meta.get("steps"),
    }


def read_adapter_meta(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``adapter.json`` of a local adapter directory (raises :class:`AdapterError`)."""
    d = Path(local_dir)
    for name in ADAPTER_FILES:
        if not (d / name).is_file():
            raise AdapterError(f"adapter directory {d} has no {name}")
    try:
        meta = json.loads((d / ADAPTER_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{d / ADAPTER_JSON} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"{d / ADAPTER_JSON} is not a JSON object")
    return meta


class ArtifactStore:
    """Adapter files under an fsspec URL (local directory, ``file://``, ``s3://``, ...).

    Layout: ``{url}/{tenant}/{identity}/{job_key}/adapter.safetensors|adapter.json``. Temporary
    uploads live at ``{url}/{tenant}/{identity}/.tmp-{job_key}-{random}/`` and are removed on
    failure.
    """

    def __init__(
        self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
    ):
        self.url = os.fspath(url)
        self.storage_options = (
            default_storage_options(self.url) if storage_options is None else dict(storage_options)
        )
        self.fs, self.root = url_to_fs(self.url, self.storage_options)
        self.local = is_local_url(self.url)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # -- paths -------------------------------------------------------------------------------
    def _identity_path(self, tenant: str, identity: str) -> str:
        return _join(self.root, check_key(tenant, "tenant"), check_key(identity))

    def _job_path(self, tenant: str, identity: str, job_key: str) -> str:
        if not JOB_KEY_RE.match(job_key or ""):
            raise PFStorerError(f"job key {job_key!r} is not a safe key")
        return _join(self._identity_path(tenant, identity), job_key)

    def uri_of(self, tenant: str, identity: str, job_key: str) -> str:
        """The URI an adapter of this job has (or would have) in the store."""
        return self.fs.unstrip_protocol(self._job_path(tenant, identity, job_key))

    # -- write -------------------------------------------------------------------------------
    def _upload(self, local_path: Path, remote_path: str) -> None:
        """Copy one file into the store (one place, so tests can inject a faulty transport)."""
        self.fs.put_file(str(local_path), remote_path)

    def put_adapter(
        self, local_dir: str | os.PathLike[str], tenant: str, identity: str, job_key: str
    ) -> tuple[str, str]:
        """Upload an adapter directory; return ``(uri, sha256 of adapter.safetensors)``.

        The local tensors' hash must match ``tensors_sha256`` in ``adapter.json`` when present;
        both files are written to a temporary key, read back and compared, and only then moved to
        ``uri``. Any mismatch raises :class:`AdapterError` and leaves nothing at ``uri``.
        """
        local = Path(local_dir)
        meta = read_adapter_meta(local)
        final = self._job_path(tenant, identity, job_key)
        sha = sha256_file(local / ADAPTER_TENSORS)
        declared = meta.get("tensors_sha256")
        if declared is not None and declared != sha:
            raise AdapterError(
                f"adapter {local} is corrupt: adapter.safetensors has sha256 {sha[:12]}..., "
                f"adapter.json says {str(declared)[:12]}..."
            )
        json_sha = sha256_file(local / ADAPTER_JSON)
        tmp = _join(
            self._identity_path(tenant, identity), f".tmp-{job_key}-{uuid.uuid4().hex[:12]}"
        )
        try:
            if self.local:
                self.fs.makedirs(tmp, exist_ok=True)
            for name in ADAPTER_FILES:
                self._upload(local / name, _join(tmp, name))
            _invalidate(self.fs, tmp)
            for name, want in ((ADAPTER_TENSORS, sha), (ADAPTER_JSON, json_sha)):
                got = sha256_file(_join(tmp, name), self.fs)
                if got != want:
                    raise AdapterError(
                        f"upload of {name} to {self.fs.unstrip_protocol(tmp)} is corrupt: "
                        f"sha256 {got[:12]}... != {want[:12]}..."
                    )
            self._move_into_place(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp, recursive=True)
            raise
        # the move kept the bytes: the sizes must agree (a cheap check, no second download)
        _invalidate(self.fs, final)
        size = self.fs.size(_join(final, ADAPTER_TENSORS))
        if size != (local / ADAPTER_TENSORS).stat().st_size:
            raise AdapterError(f"adapter at {self.fs.unstrip_protocol(final)} has the wrong size")
        return self.fs.unstrip_protocol(final), sha

    def _move_into_place(self, tmp: str, final: str) -> None:
        _invalidate(self.fs)
        if self.local:
            # a directory rename is atomic on one filesystem; a leftover from a crashed run that
            # was never registered (same job key) is replaced.
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            return
        # object stores: per-file server-side copy, JSON last (its presence marks completeness)
        for name in ADAPTER_FILES:
            self.fs.copy(_join(tmp, name), _join(final, name))
        self.fs.rm(tmp, recursive=True)

    # -- read --------------------------------------------------------------------------------
    def fetch_adapter(
        self, uri: str, dest_dir: str | os.PathLike[str], expected_sha256: str
    ) -> Path:
        """Download the adapter at ``uri`` into ``dest_dir`` and verify its sha256.

        Files are written beside ``dest_dir`` first and renamed into place only after the
        tensors' sha256 equals ``expected_sha256`` (and ``adapter.json`` agrees); otherwise
        :class:`AdapterError` is raised and nothing is left behind.
        """
        dest = Path(dest_dir)
        opts = self.storage_options if not is_local_url(uri) else None
        fs, root = url_to_fs(uri, opts)
        _invalidate(fs, root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            for name in ADAPTER_FILES:
                try:
                    fs.get_file(_join(root, name), str(tmp / name))
                except FileNotFoundError as exc:
                    raise AdapterError(f"adapter at {uri} has no {name}") from exc
            got = sha256_file(tmp / ADAPTER_TENSORS)
            if got != expected_sha256:
                raise AdapterError(
                    f"adapter at {uri} fails verification: sha256 {got[:12]}... "
                    f"!= expected {str(expected_sha256)[:12]}..."
                )
            declared = read_adapter_meta(tmp).get("tensors_sha256")
            if declared is not None and declared != got:
                raise AdapterError(f"adapter at {uri}: adapter.json disagrees with its tensors")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def read_adapter(self, uri: str, expected_sha256: str) -> tuple[bytes, dict[str, Any]]:
        """The adapter at ``uri`` in memory: ``(safetensors bytes, adapter.json dict)``, verified
        against ``expected_sha256`` (for a host-RAM cache that never touches local disk)."""
        opts = self.storage_options if not is_local_url(uri) else None
        fs, root = url_to_fs(uri, opts)
        _invalidate(fs, root)
        try:
            data = fs.cat_file(_join(root, ADAPTER_TENSORS))
            meta = json.loads(fs.cat_file(_join(root, ADAPTER_JSON)))
        except FileNotFoundError as exc:
            raise AdapterError(f"adapter at {uri} is missing a file") from exc
        except ValueError as exc:
            raise AdapterError(f"adapter at {uri} has an unreadable adapter.json") from exc
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise AdapterError(
                f"adapter at {uri} fails verification: sha256 {got[:12]}... "
                f"!= expected {str(expected_sha256)[:12]}..."
            )
        if meta.get("tensors_sha256") not in (None, got):
            raise AdapterError(f"adapter at {uri}: adapter.json disagrees with its tensors")
        return data, meta

    # -- delete / inspect ----------------------------------------------------------------------
    def exists(self, tenant: str, identity: str, job_key: str | None = None) -> bool:
        """Whether anything is stored for the person (or the complete adapter of one job)."""
        path = (
            _join(self._job_path(tenant, identity, job_key), ADAPTER_JSON)
            if job_key
            else self._identity_path(tenant, identity)
        )
        _invalidate(self.fs)
        return bool(self.fs.exists(path))

    def list_files(self, tenant: str | None = None, identity: str | None = None) -> list[str]:
        """URIs of every stored file (of a tenant, or of one person)."""
        path = self.root
        if tenant is not None:
            path = _join(path, check_key(tenant, "tenant"))
            if identity is not None:
                path = _join(path, check_key(identity))
        _invalidate(self.fs)
        if not self.fs.exists(path):
            return []
        return sorted(self.fs.unstrip_protocol(p) for p in self.fs.find(path))

    def delete_identity(self, tenant: str, identity: str) -> int:
        """Remove every file of one person (all jobs, leftovers); return how many were removed."""
        path = self._identity_path(tenant, identity)
        _invalidate(self.fs)
        if not self.fs.exists(path):
            return 0
        n = len(self.fs.find(path))
        self.fs.rm(path, recursive=True)
        _invalidate(self.fs)
        return n


# ---------------------------------------------------------------------------------------------
# adapter index
# ---------------------------------------------------------------------------------------------

INDEX_SCHEMA = pa.schema(
    [
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("identity", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("base_fingerprint", pa.string()),
        pa.field("job_key", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """Where serving finds a person's current adapter."""

    tenant: str
    identity: str
    version: int
    uri: str
    sha256: str
    base_fingerprint: str | None = None
    job_key: str | None = None
    updated_at: datetime | None = None

    @property
    def key(self) -> str:
        """``tenant/identity`` (serving's multiplexed model id)."""
        return f"{self.tenant}/{self.identity}"

    @property
    def model_name(self) -> str:
        return model_name(self.tenant, self.identity)

    @property
    def label(self) -> str:
        """``tenant/identity@version`` (the header serving answers with)."""
        return f"{self.key}@{self.version}"

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        if row["updated_at"] is None:
            row["updated_at"] = datetime.now(UTC)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> IndexEntry:
        return cls(
            tenant=row["tenant"],
            identity=row["identity"],
            version=int(row["version"]),
            uri=row["uri"],
            sha256=row["sha256"],
            base_fingerprint=row.get("base_fingerprint"),
            job_key=row.get("job_key"),
            updated_at=row.get("updated_at"),
        )


class AdapterIndex:
    """(tenant, identity) -> :class:`IndexEntry`, one Parquet file at a URL.

    Reads are served from memory; before each read the file's signature (size + mtime/inode on
    local disks, ETag/LastModified on object stores) is checked - at most every ``max_age_s``
    seconds - and the file re-read when it changed, so a long-running server sees new adapters.
    Writes re-read, merge and replace the whole file atomically (temp file + rename locally, a
    single PUT on object stores); local writers also take a file lock.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        max_age_s: float = 0.0,
    ):
        self.url = os.fspath(url)
        self.storage_options = (
            default_storage_options(self.url) if storage_options is None else dict(storage_options)
        )
        self.fs, self.path = url_to_fs(self.url, self.storage_options)
        self.local = is_local_url(self.url)
        self.max_age_s = max_age_s
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], IndexEntry] = {}
        self._sig: object = None
        self._checked_at = float("-inf")

    def __repr__(self) -> str:
        return f"AdapterIndex({self.url!r})"

    # -- reading ------------------------------------------------------------------------------
    def _signature(self) -> object:
        _invalidate(self.fs, self.path)
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None
        return tuple(
            str(info.get(k))
            for k in ("size", "mtime", "ino", "ETag", "LastModified", "created")
            if info.get(k) is not None
        )

    def _read(self) -> dict[tuple[str, str], IndexEntry]:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return {}
        table = pq.read_table(io.BytesIO(data))
        out = {}
        for row in table.to_pylist():
            e = IndexEntry.from_row(row)
            out[(e.tenant, e.identity)] = e
        return out

    def refresh(self, force: bool = False) -> bool:
        """Re-read the file if it changed; return True if the entries were reloaded."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked_at < self.max_age_s:
                return False
            self._checked_at = now
            sig = self._signature()
            if not force and sig == self._sig:
                return False
            self._entries = self._read() if sig is not None else {}
            self._sig = sig
            return True

    def get(self, tenant: str, identity: str) -> IndexEntry | None:
        self.refresh()
        return self._entries.get((tenant, identity))

    def list(self, tenant: str | None = None) -> list[IndexEntry]:
        """Entries of one tenant (or all), sorted by (tenant, identity)."""
        self.refresh()
        return [e for k, e in sorted(self._entries.items()) if tenant is None or k[0] == tenant]

    def __len__(self) -> int:
        self.refresh()
        return len(self._entries)

    # -- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        with self._lock:
            if not self.local:
                yield
                return
            import fcntl

            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.path}.lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _write(self, entries: dict[tuple[str, str], IndexEntry]) -> None:
        rows = [entries[k].to_row() for k in sorted(entries)]
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        if self.local:
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(self.path, data)  # one PUT: readers see the old or the new file
        self._entries = entries
        self._sig = self._signature()
        self._checked_at = time.monotonic()

    def _modify(self, fn: Callable[[dict[tuple[str, str], IndexEntry]], bool]) -> bool:
        with self._write_lock():
            entries = dict(self._read()) if self._signature() is not None else {}
            changed = fn(entries)
            if changed:
                self._write(entries)
            else:
                self._entries, self._sig = entries, self._signature()
            return changed

    def upsert(self, entries: Iterable[IndexEntry]) -> None:
        """Insert or replace the rows of these people."""
        new = list(entries)
        for e in new:
            check_key(e.tenant, "tenant")
            check_key(e.identity)

        def apply(cur: dict[tuple[str, str], IndexEntry]) -> bool:
            for e in new:
                cur[(e.tenant, e.identity)] = e
            return bool(new)

        self._modify(apply)

    def remove(self, tenant: str, identity: str) -> bool:
        """Drop a person's row; True if there was one."""
        return self._modify(lambda cur: cur.pop((tenant, identity), None) is not None)


# ---------------------------------------------------------------------------------------------
# MLflow model registry
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")

_TRANSIENT_MARKERS = (
    "database is locked",
    "database table is locked",
    "operationalerror",
    "deadlock",
    "too many connections",
    "too many clients",
    "connection refused",
    "connection reset",
    "connection aborted",
    "temporarily unavailable",
    "temporarily_unavailable",
    "max retries exceeded",
    "timed out",
)


def _is_transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(m in text for m in _TRANSIENT_MARKERS)


def _retry(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.1) -> T:
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not _is_transient(exc):
                raise
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            log.warning(
                "%s: transient error (%s), retry %d in %.2fs", what, exc, attempt + 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


@dataclasses.dataclass(frozen=True)
class ModelVersionInfo:
    """The parts of an MLflow model version that pfstorer uses."""

    name: str
    version: int
    source: str
    run_id: str | None
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_mlflow(cls, mv: Any) -> ModelVersionInfo:
        return cls(
            name=mv.name,
            version=int(mv.version),
            source=mv.source,
            run_id=mv.run_id or None,
            tags=dict(mv.tags or {}),
            aliases=tuple(getattr(mv, "aliases", None) or ()),
        )


_TAG_LIMIT = 5000  # well under MLflow's limits for every store


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else _canonical_json(value)
    return text if len(text) <= _TAG_LIMIT else text[: _TAG_LIMIT - 3] + "..."


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


class ModelRegistry:
    """MLflow tracking + model registry for adapters (one registered model per person).

    ``artifact_location``: where new experiments keep run artifacts. Default: beside a SQLite
    database (``<db dir>/mlartifacts``), the server's default for ``http(s)://`` tracking URIs.
    Never the current directory.
    """

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        *,
        artifact_location: str | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        if artifact_location is None and (db := _sqlite_path(tracking_uri)) is not None:
            artifact_location = (db.parent / "mlartifacts").as_uri()
        self.artifact_location = artifact_location
        self._client: Any = None
        self._experiments: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The ``MlflowClient``, made on first use (a fresh SQLite database is created then)."""
        with self._lock:
            if self._client is None:
                # one line per finished run on stdout would flood a pipeline's log
                os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
                from mlflow import MlflowClient

                for uri in {self.tracking_uri, self.registry_uri}:
                    if (db := _sqlite_path(uri)) is not None:
                        db.parent.mkdir(parents=True, exist_ok=True)
                self._client = MlflowClient(
                    tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
                )
            return self._client

    def __repr__(self) -> str:
        return f"ModelRegistry({self.tracking_uri!r})"

    # -- lookups -------------------------------------------------------------------------------
    def versions(self, tenant: str, identity: str) -> list[ModelVersionInfo]:
        """All versions of a person's registered model, oldest first ([] if none)."""
        name = model_name(tenant, identity)
        found = _retry(
            lambda: self.client.search_model_versions(f"name = '{name}'", max_results=10000),
            what=f"search versions of {name}",
        )
        return sorted((ModelVersionInfo.from_mlflow(mv) for mv in found), key=lambda v: v.version)

    def find_version(self, tenant: str, identity: str, job_key: str) -> ModelVersionInfo | None:
        """The version registered by this job key (for idempotency), or None."""
        for v in self.versions(tenant, identity):
            if v.tags.get("job_key") == job_key:
                return v
        return None

    def get_prod(self, tenant: str, identity: str) -> ModelVersionInfo | None:
        """The version behind alias ``prod``, or None."""
        name = model_name(tenant, identity)
        try:
            mv = _retry(
                lambda: self.client.get_model_version_by_alias(name, PROD_ALIAS),
                what=f"get {name}@{PROD_ALIAS}",
            )
        except Exception as exc:
            if _error_code(exc) in (
                "RESOURCE_DOES_NOT_EXIST",
                "INVALID_PARAMETER_VALUE",
                "NOT_FOUND",
            ):
                return None
            raise
        return ModelVersionInfo.from_mlflow(mv)

    # -- writes --------------------------------------------------------------------------------
    def _ensure_model(self, tenant: str, identity: str) -> str:
        name = model_name(tenant, identity)

        def create() -> None:
            try:
                self.client.create_registered_model(
                    name,
                    tags={"pfstorer": "adapter", "tenant": tenant, "identity": identity},
                    description=f"pfstorer adapter of {identity} (tenant {tenant})",
                )
            except Exception as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise

        _retry(create, what=f"create registered model {name}")
        return name

    def register(
        self,
        tenant: str,
        identity: str,
        artifact_uri: str,
        sha256: str,
        lineage: Mapping[str, Any],
        run_id: str | None = None,
        *,
        job_key: str | None = None,
    ) -> int:
        """Register ``artifact_uri`` as a new version; move alias ``prod`` to the newest version.

        ``lineage`` keys become version tags (dicts/lists as JSON): pass ``base_fingerprint``,
        ``manifest_uri``, ``manifest_hash``, ``config``, ``metrics``, ``base_licence``... The
        ``job_key`` (argument or ``lineage["job_key"]``) makes this idempotent: if a version with
        that tag exists (also after a retried, half-finished call) its number is returned.
        """
        job_key = job_key or lineage.get("job_key")
        name = self._ensure_model(tenant, identity)
        tags = {str(k): _tag(v) for k, v in lineage.items() if v is not None}
        tags.update(
            tenant=tenant,
            identity=identity,
            sha256=sha256,
            artifact_uri=artifact_uri,
        )
        if job_key:
            tags["job_key"] = job_key

        def create() -> int:
            if job_key and (found := self.find_version(tenant, identity, job_key)) is not None:
                return found.version
            mv = self.client.create_model_version(
                name,
                source=artifact_uri,
                run_id=run_id,
                tags=tags,
                description=f"adapter sha256 {sha256}",
                await_creation_for=0,
            )
            return int(mv.version)

        version = _retry(create, what=f"create version of {name}")
        if job_key:
            version = self._settle(tenant, identity, job_key, version)
        self._move_prod(tenant, identity)
        return version

    def _settle(self, tenant: str, identity: str, job_key: str, version: int) -> int:
        """Two writers racing on one job key (a retried task beside a slow original) may both
        have created a version: keep the oldest, delete the others; every racer returns it."""
        same = [v for v in self.versions(tenant, identity) if v.tags.get("job_key") == job_key]
        if len(same) <= 1:
            return same[0].version if same else version
        name = model_name(tenant, identity)
        for v in same[1:]:
            with contextlib.suppress(Exception):  # the other racer may have deleted it already
                self.client.delete_model_version(name, str(v.version))
        return same[0].version

    def _move_prod(self, tenant: str, identity: str) -> None:
        name = model_name(tenant, identity)
        versions = self.versions(tenant, identity)
        if not versions:
            return
        newest = versions[-1].version
        _retry(
            lambda: self.client.set_registered_model_alias(name, PROD_ALIAS, str(newest)),
            what=f"set {name}@{PROD_ALIAS}",
        )

    def _experiment_id(self, tenant: str) -> str:
        name = f"{MODEL_PREFIX}/{check_key(tenant, 'tenant')}"
        with self._lock:
            if name in self._experiments:
                return self._experiments[name]

        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            location = (
                _join(self.artifact_location, tenant) if self.artifact_location else None
            )
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                return self.client.get_experiment_by_name(name).experiment_id

        eid = _retry(get_or_create, what=f"experiment {name}")
        with self._lock:
            self._experiments[name] = eid
        return eid

    def log_job_run(
        self,
        tenant: str,
        identity: str,
        params: Mapping[str, Any],
        loss_curve: Iterable[float],
        metrics: Mapping[str, float],
        *,
        job_key: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """One finished MLflow run per personalization job; returns its run id.

        Experiment ``pfstorer/{tenant}``; nested ``params`` are flattened (``config.lr``); the
        loss curve is metric ``loss`` with one step per value; ``metrics`` are logged once; a
        ``job.json`` artifact keeps all of it together.
        """
        from mlflow.entities import Metric, Param

        eid = self._experiment_id(tenant)
        run_tags = {"tenant": tenant, "identity": identity, "pfstorer": "personalize"}
        if job_key:
            run_tags["job_key"] = job_key
        run_tags.update(tags or {})
        run = _retry(
            lambda: self.client.create_run(
                eid, run_name=f"{identity}-{(job_key or '')[:8]}".rstrip("-"), tags=run_tags
            ),
            what="create run",
        )
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        flat = _flatten(params)
        curve = [float(x) for x in loss_curve]
        plist = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
        mlist = [Metric("loss", v, now, i) for i, v in enumerate(curve)]
        mlist += [Metric(str(k), float(v), now, len(curve)) for k, v in sorted(metrics.items())]
        for i in range(0, len(plist), 100):
            _retry(
                lambda i=i: self.client.log_batch(run_id, params=plist[i : i + 100]),
                what="log params",
            )
        for i in range(0, len(mlist), 1000):
            _retry(
                lambda i=i: self.client.log_batch(run_id, metrics=mlist[i : i + 1000]),
                what="log metrics",
            )
        record = {
            "tenant": tenant,
            "identity": identity,
            "job_key": job_key,
            "params": dict(params),
            "metrics": dict(metrics),
            "loss_curve": curve,
        }
        _retry(
            lambda: self.client.log_text(run_id, _canonical_json(record), "job.json"),
            what="log job.json",
        )
        _retry(lambda: self.client.set_terminated(run_id, "FINISHED"), what="end run")
        return run_id

    def job_runs(
        self, tenant: str, identity: str | None = None, *, include_deleted: bool = False
    ) -> list[Any]:
        """MLflow runs of a tenant's jobs (of one person); soft-deleted ones on request."""
        from mlflow.entities import ViewType

        exp = self.client.get_experiment_by_name(f"{MODEL_PREFIX}/{check_key(tenant, 'tenant')}")
        if exp is None:
            return []
        flt = f"tags.identity = '{check_key(identity)}'" if identity else ""
        runs: list[Any] = []
        token = None
        while True:
            page = _retry(
                lambda: self.client.search_runs(
                    [exp.experiment_id],
                    filter_string=flt,
                    run_view_type=ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY,
                    max_results=1000,
                    page_token=token,
                ),
                what="search runs",
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def delete(self, tenant: str, identity: str) -> dict[str, int | bool]:
        """Remove the person's registered model (all versions) and job runs with their artifacts.

        Runs are deleted and, on a directly reachable SQL store, purged; behind an MLflow server
        they are soft-deleted (purge with ``mlflow gc`` there). Returns counts.
        """
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        name = model_name(tenant, identity)
        versions = self.versions(tenant, identity)
        model_deleted = False
        try:
            _retry(lambda: self.client.delete_registered_model(name), what=f"delete {name}")
            model_deleted = True
        except Exception as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        runs = self.job_runs(tenant, identity, include_deleted=True)
        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        deleted = purged = 0
        for run in runs:
            with contextlib.suppress(Exception):
                get_artifact_repository(
                    run.info.artifact_uri, tracking_uri=self.tracking_uri
                ).delete_artifacts()
            if run.info.lifecycle_stage != "deleted":
                _retry(lambda r=run: self.client.delete_run(r.info.run_id), what="delete run")
                deleted += 1
            if hasattr(store, "_hard_delete_run"):
                _retry(lambda r=run: store._hard_delete_run(r.info.run_id), what="purge run")
                purged += 1
        return {
            "model_deleted": model_deleted,
            "versions": len(versions),
            "runs": deleted,
            "runs_purged": purged,
        }


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = _canonical_json(list(v))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# facade
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForgetReport:
    """What ``forget`` removed for one person."""

    tenant: str
    identity: str
    index_removed: bool
    model_deleted: bool
    versions_deleted: int
    runs_deleted: int
    files_deleted: int
    runs_purged: int = 0  # runs also removed from the database (direct SQL stores only)

    @property
    def runs_pending_gc(self) -> int:
        """Soft-deleted runs (behind an MLflow server) that ``mlflow gc`` there will purge."""
        return max(self.runs_deleted - self.runs_purged, 0)

    @property
    def found_anything(self) -> bool:
        return bool(
            self.index_removed
            or self.model_deleted
            or self.runs_deleted
            or self.runs_purged
            or self.files_deleted
        )


def local_defaults(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> dict[str, str]:
    """Local single-machine URLs under ``state_dir``: store, SQLite tracking URI, index (the
    same layout :class:`pfstorer.settings.Settings` derives from its ``state_dir``)."""
    root = Path(state_dir).expanduser().resolve()
    return {
        "store_url": str(root / "adapters"),
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "index_url": str(root / "index.parquet"),
    }


class AdapterRegistry:
    """Store + registry + index as one: what pipelines publish and serving resolves."""

    def __init__(self, store: ArtifactStore, index: AdapterIndex, models: ModelRegistry | None):
        self.store = store
        self.index = index
        self._models = models

    @property
    def models(self) -> ModelRegistry:
        if self._models is None:
            raise PFStorerError("this AdapterRegistry was built without an MLflow tracking URI")
        return self._models

    @classmethod
    def from_urls(
        cls,
        store_url: str,
        tracking_uri: str | None,
        index_url: str,
        *,
        registry_uri: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
        index_max_age_s: float = 0.0,
    ) -> AdapterRegistry:
        """Build from three URLs. ``tracking_uri=None`` gives a read-only (serving) registry
        that never imports MLflow: ``resolve`` and ``fetch`` work, ``publish``/``forget`` do not."""
        store = ArtifactStore(store_url, storage_options)
        index = AdapterIndex(index_url, storage_options, max_age_s=index_max_age_s)
        models = (
            ModelRegistry(tracking_uri, registry_uri, artifact_location=artifact_location)
            if tracking_uri
            else None
        )
        return cls(store, index, models)

    @classmethod
    def from_settings(cls, settings: Any = None, **kwargs: Any) -> AdapterRegistry:
        """From a :class:`pfstorer.settings.Settings` (default: ``Settings.load()``, i.e.
        ``PFSTORER_*`` environment, config file, then local defaults under ``state_dir``):
        ``store_url``, ``tracking_uri``, ``index_url``, ``registry_uri``, ``storage_options``."""
        if settings is None:
            from pfstorer.settings import Settings

            settings = Settings.load()
        return cls.from_urls(
            settings.store_url,
            settings.tracking_uri,
            settings.index_url,
            registry_uri=settings.registry_uri,
            storage_options=settings.storage_options or None,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"AdapterRegistry({self.store!r}, {self.index!r}, {self._models!r})"

    # -- publish ------------------------------------------------------------------------------
    def _entry_of(self, tenant: str, identity: str, v: ModelVersionInfo) -> IndexEntry:
        return IndexEntry(
            tenant=tenant,
            identity=identity,
            version=v.version,
            uri=v.tags.get("artifact_uri") or v.source,
            sha256=v.tags["sha256"],
            base_fingerprint=v.tags.get("base_fingerprint"),
            job_key=v.tags.get("job_key"),
            updated_at=datetime.now(UTC),
        )

    def publish(
        self,
        local_dir: str | os.PathLike[str],
        tenant: str,
        identity: str,
        job_key: str,
        lineage: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> IndexEntry:
        """Store, verify, register and index one adapter; idempotent by ``job_key``.

        If a version with this job key is registered already, nothing is stored or registered
        (the index is repaired if a crash left it behind) and that version's entry is returned.
        Otherwise: upload to a temporary key -> sha256 verified -> moved into place ->
        registered in MLflow (lineage tags, alias ``prod``) -> index row upserted. A failure at
        any step before registration leaves no version behind.
        """
        check_key(tenant, "tenant")
        check_key(identity)
        meta = read_adapter_meta(local_dir)
        for field, want in (("identity", identity), ("tenant", tenant)):
            if meta.get(field) not in (None, want):
                raise AdapterError(
                    f"adapter in {local_dir} belongs to {field} {meta.get(field)!r}, not {want!r}"
                )
        existing = self.models.find_version(tenant, identity, job_key)
        if existing is not None:
            entry = self._entry_of(tenant, identity, existing)
            current = self.index.get(tenant, identity)
            if current is not None and current.version == entry.version:
                return current
            if current is None or current.version < entry.version:
                self.index.upsert([entry])  # a crash between register and index: repair
            return entry
        uri, sha = self.store.put_adapter(local_dir, tenant, identity, job_key)
        tags = adapter_tags(meta)
        tags.update(lineage or {})
        version = self.models.register(
            tenant, identity, uri, sha, tags, run_id=run_id, job_key=job_key
        )
        entry = IndexEntry(
            tenant=tenant,
            identity=identity,
            version=version,
            uri=uri,
            sha256=sha,
            base_fingerprint=meta.get("base_fingerprint"),
            job_key=job_key,
            updated_at=datetime.now(UTC),
        )
        self.index.upsert([entry])
        return entry

    # -- read ---------------------------------------------------------------------------------
    def resolve(self, tenant: str, identity: str) -> IndexEntry | None:
        """The person's current adapter from the index (no MLflow call), or None."""
        if not (is_safe_key(tenant, "tenant") and is_safe_key(identity)):
            return None
        return self.index.get(tenant, identity)

    def fetch(self, entry: IndexEntry, cache_dir: str | os.PathLike[str]) -> Path:
        """Local directory of a verified copy of the adapter (cached by sha256)."""
        dest = Path(cache_dir) / entry.tenant / entry.identity / entry.sha256
        if (dest / ADAPTER_JSON).is_file() and (dest / ADAPTER_TENSORS).is_file():
            if sha256_file(dest / ADAPTER_TENSORS) == entry.sha256:
                return dest
            shutil.rmtree(dest, ignore_errors=True)
        return self.store.fetch_adapter(entry.uri, dest, entry.sha256)

    def read(self, entry: IndexEntry) -> tuple[bytes, dict[str, Any]]:
        """The adapter in memory, verified: ``(safetensors bytes, adapter.json dict)``."""
        return self.store.read_adapter(entry.uri, entry.sha256)

    def load_adapter(self, entry: IndexEntry, model: Any) -> Any:
        """The :class:`pfstorer.adapter.Adapter` an index entry points at, ready for ``model``.

        Bytes are read into memory and checked against the index's sha256 before parsing (only
        safetensors); the JSON must name the entry's tenant and identity; the adapter must belong
        to ``model``'s base (:class:`~pfstorer.errors.AdapterMismatchError` otherwise).
        """
        from pfstorer.adapter import Adapter

        data, meta = self.read(entry)
        adapter = Adapter.from_bytes(data, meta, source=f"adapter {entry.label}")
        if adapter.identity != entry.identity or adapter.metadata.tenant not in (None, entry.tenant):
            raise AdapterError(f"adapter file of {entry.label} belongs to another person")
        adapter.check_base(model)
        return adapter

    # -- forget -------------------------------------------------------------------------------
    def forget(
        self, tenant: str, identity: str, *, cache_dir: str | os.PathLike[str] | None = None
    ) -> ForgetReport:
        """Remove every trace of a person: index row first (serving stops resolving it), then
        the registered model with its versions and job runs, then the stored files (and a local
        fetch cache, if given). Safe to repeat."""
        check_key(tenant, "tenant")
        check_key(identity)
        index_removed = self.index.remove(tenant, identity)
        deleted = self.models.delete(tenant, identity)
        files = self.store.delete_identity(tenant, identity)
        if cache_dir is not None:
            shutil.rmtree(Path(cache_dir) / tenant / identity, ignore_errors=True)
        return ForgetReport(
            tenant=tenant,
            identity=identity,
            index_removed=index_removed,
            model_deleted=bool(deleted["model_deleted"]),
            versions_deleted=int(deleted["versions"]),
            runs_deleted=int(deleted["runs"]),
            files_deleted=files,
            runs_purged=int(deleted["runs_purged"]),
        )

""":class:`AdapterRegistry`: store, registry and index behind one object (publish, resolve, fetch, forget)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pfstorer.errors import AdapterError, PFStorerError
from registry.keys import ADAPTER_JSON, ADAPTER_TENSORS, DEFAULT_STATE_DIR, check_key, is_safe_key, sha256_file
from registry.artifacts import ArtifactStore, adapter_tags, read_adapter_meta
from registry.index import AdapterIndex, IndexEntry
from registry.models import ModelRegistry, ModelVersionInfo, Registration


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
    job_records_deleted: int = 0  # the person's job in a job run (kept for its other people)

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
            or self.job_records_deleted
            or self.files_deleted
        )


@dataclasses.dataclass(frozen=True)
class StoredRegistration:
    """An adapter in the store to register (the arguments of :meth:`AdapterRegistry.register_stored`)."""

    tenant: str
    identity: str
    uri: str
    sha256: str
    meta: Mapping[str, Any]
    lineage: Mapping[str, Any] | None
    run_id: str | None
    job_key: str


def local_defaults(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> dict[str, str]:
    """Local single-machine URLs under ``state_dir``: store, SQLite tracking URI, index (the
    same layout :class:`pfstorer.settings.Settings` derives from its ``state_dir``)."""
    root = Path(state_dir).expanduser().resolve()
    return {
        "store_url": str(root / "adapters"),
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "index_url": str(root / "index.parquet"),
    }


def entry_of_version(tenant: str, identity: str, v: ModelVersionInfo) -> IndexEntry:
    """The index entry of a registered version (its tags name the file, its hash and its base)."""
    return IndexEntry(
        tenant=tenant,
        identity=identity,
        version=v.version,
        uri=v.tags.get("artifact_uri") or v.source,
        sha256=v.tags.get("sha256", ""),
        base_fingerprint=v.tags.get("base_fingerprint"),
        job_key=v.tags.get("job_key"),
        updated_at=datetime.now(UTC),
    )


def _check_owner(meta: Mapping[str, Any], tenant: str, identity: str, where: str) -> None:
    for field, want in (("identity", identity), ("tenant", tenant)):
        if meta.get(field) not in (None, want):
            raise AdapterError(f"adapter in {where} belongs to {field} {meta.get(field)!r}, not {want!r}")


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
    def from_settings(cls, settings: Any = None, *, read_only: bool = False, **overrides: Any) -> AdapterRegistry:
        """The one way to build the registry from a :class:`pfstorer.settings.Settings` (default:
        ``Settings.load()``): ``store_url``, ``tracking_uri``, ``index_url``, ``registry_uri``,
        ``storage_options``. ``read_only`` (serving) never touches MLflow; ``overrides`` replace
        any :meth:`from_urls` argument (``index_max_age_s``, ``storage_options``, ...)."""
        if settings is None:
            from pfstorer.settings import Settings

            settings = Settings.load()
        kwargs: dict[str, Any] = {
            "store_url": settings.store_url,
            "tracking_uri": None if read_only else settings.tracking_uri,
            "index_url": settings.index_url,
            "registry_uri": settings.registry_uri,
            "storage_options": settings.storage_options or None,
        }
        kwargs.update(overrides)
        return cls.from_urls(kwargs.pop("store_url"), kwargs.pop("tracking_uri"), kwargs.pop("index_url"), **kwargs)

    def __repr__(self) -> str:
        return f"AdapterRegistry({self.store!r}, {self.index!r}, {self._models!r})"

    # -- publish ------------------------------------------------------------------------------
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
        :meth:`register_stored` -> index row upserted. A failure at any step before
        registration leaves no version behind.
        """
        check_key(tenant, "tenant")
        check_key(identity)
        meta = read_adapter_meta(local_dir)
        _check_owner(meta, tenant, identity, str(local_dir))
        existing = self.models.find_version(tenant, identity, job_key)
        if existing is not None:
            entry = entry_of_version(tenant, identity, existing)
            current = self.index.get(tenant, identity)
            if current is not None and current.version == entry.version:
                return current
            if current is None or current.version < entry.version:
                self.index.upsert([entry])  # a crash between register and index: repair
            return entry
        uri, sha = self.store.put_adapter(local_dir, tenant, identity, job_key)
        entry = self.register_stored(tenant, identity, uri, sha, meta, lineage, run_id=run_id, job_key=job_key)
        self.index.upsert([entry])
        return entry

    def register_stored(
        self,
        tenant: str,
        identity: str,
        uri: str,
        sha256: str,
        meta: Mapping[str, Any],
        lineage: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        job_key: str,
    ) -> IndexEntry:
        """Register an adapter already in the store (MLflow version with lineage tags)
        and return the index entry to write: the step :meth:`publish` and the run's publisher,
        which batches index writes, share. Idempotent by ``job_key``."""
        (result,) = self.register_stored_many([StoredRegistration(tenant, identity, uri, sha256, meta, lineage,
                                                                  run_id, job_key)])
        if isinstance(result, BaseException):
            raise result
        return result

    def register_stored_many(self, items: list[StoredRegistration]) -> list[IndexEntry | Exception]:
        """:meth:`register_stored` for several people at once (one MLflow listing for all of
        them, :meth:`ModelRegistry.register_many`); per item its entry or what stopped it."""
        out: list[IndexEntry | Exception | None] = [None] * len(items)
        todo: list[tuple[int, Registration]] = []
        for i, it in enumerate(items):
            try:
                _check_owner(it.meta, it.tenant, it.identity, it.uri)
            except AdapterError as exc:
                out[i] = exc
                continue
            tags = adapter_tags(dict(it.meta))
            tags.update(it.lineage or {})
            todo.append((i, Registration(it.tenant, it.identity, it.uri, it.sha256, tags, it.run_id, it.job_key)))
        versions = self.models.register_many(r for _, r in todo) if todo else []
        for (i, _), version in zip(todo, versions):
            it = items[i]
            out[i] = version if isinstance(version, Exception) else IndexEntry(
                tenant=it.tenant, identity=it.identity, version=int(version), uri=it.uri, sha256=it.sha256,
                base_fingerprint=it.meta.get("base_fingerprint"), job_key=it.job_key, updated_at=datetime.now(UTC),
            )
        return out  # type: ignore[return-value]

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
        the registered model with its versions and its jobs in the job runs, then the stored files (and a local
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
            job_records_deleted=int(deleted["job_records"]),
        )

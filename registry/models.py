"""The MLflow model registry: one registered model per person, a version per adapter, lineage in tags.

MLflow is imported only when a :class:`ModelRegistry` first talks to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from registry.keys import MODEL_PREFIX, PROD_ALIAS, canonical_json, check_key, model_name
from registry.storage import join_url

log = logging.getLogger(__name__)
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


_RACE_MARKERS = ("not found", "does not exist", "unique constraint", "duplicate entry", "duplicate key",
                 "0 were matched")  # SQLAlchemy: the row an UPDATE named was changed by a racing writer


def _is_race(exc: BaseException) -> bool:
    """A write that lost to a concurrent one on the same model: the version it named was just
    deleted, the row it updates was just changed, or the row it inserts was just inserted
    (SQLite, PostgreSQL and MySQL wordings)."""
    text = str(exc).lower()
    return _error_code(exc) == "RESOURCE_DOES_NOT_EXIST" or any(m in text for m in _RACE_MARKERS)


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


@dataclasses.dataclass(frozen=True)
class Registration:
    """One adapter to register (the arguments of :meth:`ModelRegistry.register`)."""

    tenant: str
    identity: str
    artifact_uri: str
    sha256: str
    lineage: Mapping[str, Any]
    run_id: str | None = None
    job_key: str | None = None

    def __post_init__(self) -> None:
        if not self.job_key and self.lineage.get("job_key"):
            object.__setattr__(self, "job_key", self.lineage["job_key"])


_TAG_LIMIT = 5000  # well under MLflow's limits for every store


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
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

    def versions_of(self, names: Iterable[str]) -> dict[str, list[ModelVersionInfo]]:
        """All versions of several registered models by name, oldest first, in one search per
        100 names (``name IN (...)``); a name without versions maps to []."""
        names = sorted(set(names))
        out: dict[str, list[ModelVersionInfo]] = {n: [] for n in names}
        for i in range(0, len(names), 100):
            quoted = ", ".join(f"'{n}'" for n in names[i : i + 100])
            token = None
            while True:
                page = _retry(
                    lambda: self.client.search_model_versions(
                        f"name IN ({quoted})", max_results=10000, page_token=token
                    ),
                    what=f"search versions of {len(names[i : i + 100])} models",
                )
                for mv in page:
                    out.setdefault(mv.name, []).append(ModelVersionInfo.from_mlflow(mv))
                token = page.token
                if not token:
                    break
        for found in out.values():
            found.sort(key=lambda v: v.version)
        return out

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
    def _ensure_model(self, tenant: str, identity: str) -> bool:
        """Create the person's registered model; True if this call created it (so it has no
        versions yet), False if it existed (or a retried create may have made it)."""
        name = model_name(tenant, identity)
        tries = 0

        def create() -> bool:
            nonlocal tries
            tries += 1
            try:
                self.client.create_registered_model(
                    name,
                    tags={"pfstorer": "adapter", "tenant": tenant, "identity": identity},
                    description=f"pfstorer adapter of {identity} (tenant {tenant})",
                )
            except Exception as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                return False
            return tries == 1

        return _retry(create, what=f"create registered model {name}")

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
        One registration of :meth:`register_many`.
        """
        (result,) = self.register_many(
            [Registration(tenant, identity, artifact_uri, sha256, lineage, run_id, job_key)]
        )
        if isinstance(result, BaseException):
            raise result
        return result

    def register_many(self, items: Iterable[Registration]) -> list[int | Exception]:
        """Register several adapters (of different people); per item its version number, or the
        exception that stopped it (the others go on). Idempotent by job key as :meth:`register`.

        MLflow calls for a new person: create the registered model, create the version, set the
        alias - and one listing of the versions for the whole batch (``name IN``), which both
        settles racing writers of one job key (:meth:`_settle`) and finds the newest version for
        ``prod``. "Is this job registered already?" is asked only when the model existed before,
        and before any retried create (a call that timed out may have created the version).
        """
        items = list(items)
        results: list[int | Exception] = []
        for it in items:
            try:
                results.append(self._create_version(it))
            except Exception as exc:
                results.append(exc)
        names = [model_name(it.tenant, it.identity) for it, r in zip(items, results) if isinstance(r, int)]
        try:
            listed = self.versions_of(names) if names else {}
        except Exception as exc:
            return [exc if isinstance(r, int) else r for r in results]
        for i, (it, version) in enumerate(zip(items, results)):
            if not isinstance(version, int):
                continue
            name = model_name(it.tenant, it.identity)
            try:
                versions = listed.get(name, [])
                if it.job_key:
                    version, versions = self._settle_versions(name, it.job_key, version, versions)
                    listed[name] = versions
                self._move_prod(it.tenant, it.identity, versions)
                results[i] = version
            except Exception as exc:
                results[i] = exc
        return results

    def _create_version(self, it: Registration) -> int:
        """Registered model (if new) and version of one :class:`Registration` (not yet settled)."""
        job_key = it.job_key
        name = model_name(it.tenant, it.identity)
        check_first = not self._ensure_model(it.tenant, it.identity)
        tags = {str(k): _tag(v) for k, v in it.lineage.items() if v is not None}
        tags.update(
            tenant=it.tenant,
            identity=it.identity,
            sha256=it.sha256,
            artifact_uri=it.artifact_uri,
        )
        if job_key:
            tags["job_key"] = job_key

        def create() -> int:
            nonlocal check_first
            if job_key and check_first:
                found = self.find_version(it.tenant, it.identity, job_key)
                if found is not None:
                    return found.version
            check_first = True
            mv = self.client.create_model_version(
                name,
                source=it.artifact_uri,
                run_id=it.run_id,
                tags=tags,
                description=f"adapter sha256 {it.sha256}",
                await_creation_for=0,
            )
            return int(mv.version)

        return _retry(create, what=f"create version of {name}")

    def _settle(self, tenant: str, identity: str, job_key: str, version: int) -> int:
        """Two writers racing on one job key (a retried task beside a slow original) may both
        have created a version: keep the oldest, delete the others; every racer returns it."""
        name = model_name(tenant, identity)
        return self._settle_versions(name, job_key, version, self.versions(tenant, identity))[0]

    def _settle_versions(
        self, name: str, job_key: str, version: int, versions: list[ModelVersionInfo]
    ) -> tuple[int, list[ModelVersionInfo]]:
        """:meth:`_settle` on a listing already made: (the version kept, the versions left)."""
        same = [v for v in versions if v.tags.get("job_key") == job_key]
        if len(same) <= 1:
            return (same[0].version if same else version), versions
        for v in same[1:]:
            with contextlib.suppress(Exception):  # the other racer may have deleted it already
                self.client.delete_model_version(name, str(v.version))
        gone = {v.version for v in same[1:]}
        return same[0].version, [v for v in versions if v.version not in gone]

    def _set_alias(self, name: str, version: str) -> None:
        """``prod`` -> ``version``: straight to the registry store. ``MlflowClient``'s own method
        first reads the registered model (a prompt check pfstorer's models never need), one more
        round trip per registration."""
        registry_client = getattr(self.client, "_get_registry_client", None)
        target = registry_client() if callable(registry_client) else self.client
        target.set_registered_model_alias(name, PROD_ALIAS, version)

    def _move_prod(
        self, tenant: str, identity: str, versions: list[ModelVersionInfo] | None = None
    ) -> None:
        """Point ``prod`` at the newest version (of ``versions`` if given, a fresh listing else).
        Racing writers (see :meth:`_settle`) may delete that version or set the alias in the same
        instant: then read the versions again."""
        name = model_name(tenant, identity)
        attempts = 8
        for attempt in range(attempts):
            if versions is None:
                versions = self.versions(tenant, identity)
            if not versions:
                return
            newest = str(versions[-1].version)
            try:
                _retry(lambda: self._set_alias(name, newest), what=f"set {name}@{PROD_ALIAS}")
                return
            except Exception as exc:
                if attempt == attempts - 1 or not _is_race(exc):
                    raise
                versions = None
                time.sleep(0.02 * (attempt + 1) * (0.5 + random.random()))

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
                join_url(self.artifact_location, tenant) if self.artifact_location else None
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
        # params and metrics in as few batches as MLflow takes (100 params, 1000 entities each):
        # one call for a usual job
        while plist or mlist:
            params_now, plist = plist[:100], plist[100:]
            metrics_now, mlist = mlist[: 1000 - len(params_now)], mlist[1000 - len(params_now) :]
            _retry(
                lambda p=params_now, m=metrics_now: self.client.log_batch(run_id, metrics=m, params=p),
                what="log params and metrics",
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
            lambda: self._log_json(run.info.artifact_uri, record, "job.json"),
            what="log job.json",
        )
        _retry(lambda: self.client.set_terminated(run_id, "FINISHED"), what="end run")
        return run_id

    def _log_json(self, artifact_uri: str, record: Mapping[str, Any], file_name: str) -> None:
        """Write ``record`` as ``file_name`` into a run's artifacts, given the run's artifact URI
        (``MlflowClient.log_text`` would first fetch the run to learn it: one more round trip)."""
        import tempfile

        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri)
        with tempfile.TemporaryDirectory(prefix="pfstorer-run-") as tmp:
            path = Path(tmp) / file_name
            path.write_text(canonical_json(record))
            repo.log_artifact(str(path))

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
            out[key] = canonical_json(list(v))
        else:
            out[key] = v
    return out

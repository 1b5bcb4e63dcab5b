"""The MLflow model registry: one registered model per person, a version per adapter, lineage in tags.

Registration is the publishing step every personalized person goes through, so its cost is the
number of MLflow calls per person (each costs the server ~10 ms of CPU): two per new person
(create the registered model, create the version) plus, per publishing batch, one job run that
holds every job of the batch and one listing that settles racing writers. The index
(:mod:`registry.index`) is what serving follows; MLflow ``latest`` is the newest version.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from registry.keys import MODEL_PREFIX, canonical_json, check_key, model_name
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

    def newest(self, tenant: str, identity: str) -> ModelVersionInfo | None:
        """The person's newest version (MLflow's ``latest``), or None."""
        found = self.versions(tenant, identity)
        return found[-1] if found else None

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
        """Register ``artifact_uri`` as a new version of the person's registered model.

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

        MLflow calls for a new person: create the registered model, create the version - and one
        listing of the versions for the whole batch (``name IN``), which settles racing writers
        of one job key (:meth:`_settle_versions`). "Is this job registered already?" is asked
        only when the model existed before, and before any retried create (a call that timed out
        may have created the version).
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
            if it.job_key:
                try:
                    version, listed[name] = self._settle_versions(name, it.job_key, version, listed.get(name, []))
                except Exception as exc:
                    version = exc
            results[i] = version
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

    def _settle_versions(
        self, name: str, job_key: str, version: int, versions: list[ModelVersionInfo]
    ) -> tuple[int, list[ModelVersionInfo]]:
        """Two writers racing on one job key (a retried task beside a slow original) may both
        have created a version: keep the oldest, delete the others; every racer returns it.
        On a listing already made: (the version kept, the versions left)."""
        same = [v for v in versions if v.tags.get("job_key") == job_key]
        if len(same) <= 1:
            return (same[0].version if same else version), versions
        for v in same[1:]:
            with contextlib.suppress(Exception):  # the other racer may have deleted it already
                self.client.delete_model_version(name, str(v.version))
        gone = {v.version for v in same[1:]}
        return same[0].version, [v for v in versions if v.version not in gone]

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

    def log_jobs_run(
        self,
        tenant: str,
        jobs: Sequence[JobSummary],
        params: Mapping[str, Any],
        *,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """One finished MLflow run for a batch of a tenant's personalization jobs; its run id.

        Experiment ``pfstorer/{tenant}``; the batch's shared ``params`` are flattened
        (``config.lr``); each job is the run tag ``job.{identity}`` (:meth:`JobSummary.record`:
        its job key, own params, metrics and loss curve as JSON), which :meth:`delete` removes
        alone, without touching the batch's other people. Metrics: the batch's size and the mean
        of every final metric. Three calls for a batch of up to ~60 people.
        """
        from mlflow.entities import Metric, Param, RunTag

        if not jobs:
            raise ValueError("log_jobs_run needs at least one job")
        eid = self._experiment_id(tenant)
        run_tags = {"tenant": tenant, "pfstorer": "personalize", "jobs": str(len(jobs)), **(tags or {})}
        names = [j.identity for j in jobs]
        run = _retry(
            lambda: self.client.create_run(
                eid, run_name=names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}", tags=run_tags
            ),
            what="create run",
        )
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        means: dict[str, list[float]] = {}
        for j in jobs:
            for k, v in j.metrics.items():
                means.setdefault(str(k), []).append(float(v))
        metrics = [Metric("jobs", float(len(jobs)), now, 0)]
        metrics += [Metric(f"mean_{k}", sum(v) / len(v), now, 0) for k, v in sorted(means.items())]
        keyed: list[Param | RunTag] = [Param(k, str(v)[:6000]) for k, v in sorted(_flatten(params).items())]
        keyed += [RunTag(_job_tag(j.identity), j.record()) for j in jobs]
        # params and tags in batches of 100, MLflow's limit per call; the metrics ride with the first
        while keyed or metrics:
            now_keyed, keyed = keyed[:100], keyed[100:]
            _retry(
                lambda k=now_keyed, m=metrics: self.client.log_batch(
                    run_id, metrics=m, params=[x for x in k if isinstance(x, Param)],
                    tags=[x for x in k if isinstance(x, RunTag)],
                ),
                what="log params, metrics and jobs",
            )
            metrics = []
        _retry(lambda: self.client.set_terminated(run_id, "FINISHED"), what="end run")
        return run_id

    def job_runs(
        self, tenant: str, identity: str | None = None, *, include_deleted: bool = False
    ) -> list[Any]:
        """MLflow runs of a tenant's jobs (those holding one person's job); soft-deleted ones
        on request."""
        from mlflow.entities import ViewType

        exp = self.client.get_experiment_by_name(f"{MODEL_PREFIX}/{check_key(tenant, 'tenant')}")
        if exp is None:
            return []
        flt = f"tags.`{_job_tag(check_key(identity))}` LIKE '%'" if identity else ""
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
        """Remove the person's registered model (all versions) and their jobs from the job runs.

        A run that held other people's jobs too keeps them and loses only this person's tag
        (``job_records``); a run left without jobs is deleted with its artifacts and, on a
        directly reachable SQL store, purged; behind an MLflow server it is soft-deleted (purge
        with ``mlflow gc`` there). Returns counts.
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
        key = _job_tag(identity)
        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        records = deleted = purged = 0
        for run in self.job_runs(tenant, identity, include_deleted=True):
            run_id = run.info.run_id
            if run.info.lifecycle_stage != "deleted":
                _retry(lambda r=run_id: self.client.delete_tag(r, key), what="delete job tag")
                records += 1
                # racing forgets of two people of one run: each sees the other's tag gone or
                # not; the last to look deletes the run
                left = _retry(lambda r=run_id: self.client.get_run(r), what="get run").data.tags
                if any(k.startswith(_JOB_TAG_PREFIX) for k in left):
                    continue
                with contextlib.suppress(Exception):
                    get_artifact_repository(run.info.artifact_uri, tracking_uri=self.tracking_uri).delete_artifacts()
                with contextlib.suppress(Exception):  # a racing forget deleted it first
                    _retry(lambda r=run_id: self.client.delete_run(r), what="delete run")
                    deleted += 1
            if hasattr(store, "_hard_delete_run"):
                with contextlib.suppress(Exception):
                    _retry(lambda r=run_id: store._hard_delete_run(r), what="purge run")
                    purged += 1
        return {
            "model_deleted": model_deleted,
            "versions": len(versions),
            "job_records": records,
            "runs": deleted,
            "runs_purged": purged,
        }


_JOB_TAG_PREFIX = "job."


def _job_tag(identity: str) -> str:
    """The run tag that holds one person's job in a batch run."""
    return f"{_JOB_TAG_PREFIX}{identity}"


@dataclasses.dataclass(frozen=True)
class JobSummary:
    """What a job run records of one person's personalization job."""

    identity: str
    job_key: str | None
    params: Mapping[str, Any]
    metrics: Mapping[str, float]
    loss_curve: Sequence[float] = ()

    def record(self) -> str:
        """This job as JSON within MLflow's tag limit: the loss curve is thinned (every k-th
        step, the last one kept) until it fits."""
        curve = [float(x) for x in self.loss_curve]
        body = {"identity": self.identity, "job_key": self.job_key, "params": dict(self.params),
                "metrics": {str(k): float(v) for k, v in self.metrics.items()}}
        stride = 1
        while True:
            steps = list(range(0, len(curve), stride))
            if curve and steps[-1] != len(curve) - 1:
                steps.append(len(curve) - 1)
            thinned = {"loss_curve": [curve[i] for i in steps]} | ({"loss_steps": steps} if stride > 1 else {})
            text = canonical_json(body | thinned)
            if len(text) <= _TAG_LIMIT or len(steps) <= 2:
                return text if len(text) <= _TAG_LIMIT else _tag(body)
            stride *= 2


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

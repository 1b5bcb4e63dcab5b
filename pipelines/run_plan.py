"""The first half of ``pfstorer run``: validate the manifest, then plan who is left to train.

Each person's job key is ``hash(reference sha256s, base fingerprint, training config)``. A person
whose key is already in the index, or registered in MLflow (a crash between registration and the
index write is repaired here), is skipped. Packing, worker count and retries are not part of the
key: they do not change what an identity learns.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.cluster import check_capacity, cluster_address, ensure_ray, shutdown_ray
from pipelines.records import PersonJob, RefPhoto
from pipelines.run_summary import IdentityOutcome

__all__ = ["RunPlan", "prepare_run", "recover_published", "storage_options_of"]

_SETTINGS_FIELDS = (
    "state_dir", "base", "base_weights", "store_url", "index_url", "tracking_uri", "registry_uri",
    "storage_options", "ray_address", "workers", "cpus_per_worker", "gpus_per_worker", "max_retries",
    "snapshot_interval_s",
)  # fmt: skip


@dataclasses.dataclass
class RunPlan:
    """A validated manifest and what is left to train (output of :func:`prepare_run`)."""

    run_id: str
    settings: Any  # pfstorer.settings.Settings
    manifest_url: str
    manifest_hash: str
    rows: int
    config: Any  # pfstorer.training.PersonalizeConfig
    key_config: dict[str, Any]  # what the job key hashes (config + dry_train flag)
    base_fingerprint: str
    base_preset: str
    base_licence: str
    validation: Any  # pipelines.validate.ValidationResult
    quarantine_url: str | None
    todo: list[PersonJob]  # what the job queue leases to the workers
    skipped: list[IdentityOutcome]
    index_repaired: int
    dry_train: bool
    started_at: str
    timings: dict[str, float]
    owns_ray: bool = False  # prepare_run started Ray; execute_run shuts it down

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.state_dir) / "runs" / self.run_id


def check_dry_train_registry(settings: Any) -> None:
    """Refuse a dry run (untrained adapters, for scheduler benchmarks) that would publish into a
    configured registry: it may only write the local one inside ``state_dir`` (the defaults of
    ``store_url``, ``index_url`` and ``tracking_uri``), which no server reads unless told to."""
    from pfstorer.errors import PFStorerError

    root = str(settings.state_dir)
    outside = [name for name, url in (("store_url", settings.store_url), ("index_url", settings.index_url))
               if "://" in str(url) or not str(url).startswith(root)]
    if not str(settings.tracking_uri).startswith(f"sqlite:///{root}"):
        outside.append("tracking_uri")
    if outside:
        raise PFStorerError(
            f"--dry-train publishes untrained adapters, so it only writes the local registry in the state "
            f"dir ({root}); {', '.join(outside)} point elsewhere: leave them unset (or use another --state-dir)")


def _make_settings(settings: Any, overrides: Mapping[str, Any]) -> Any:
    from pfstorer.settings import Settings

    over = {k: v for k, v in overrides.items() if v is not None}
    steps = over.pop("steps", None)
    config_path = over.pop("config_path", None)
    unknown = set(over) - set(_SETTINGS_FIELDS)
    if unknown:
        raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))}")
    if settings is None:
        s = Settings.load(config_path, **over)
    elif over:
        data = settings.model_dump()
        if "state_dir" in over:  # let the local defaults follow the new state dir
            for k in ("store_url", "index_url", "probe_cache_url", "tracking_uri"):
                data.pop(k, None)
        data.update(over)
        s = Settings.load(None, **data)
    else:
        s = settings
    if steps is not None:
        s = s.model_copy(update={"personalize": s.personalize.model_copy(update={"steps": int(steps)})})
    return s


def storage_options_of(settings: Any) -> dict[str, Any] | None:
    return dict(settings.storage_options) or None


def _registry(settings: Any) -> Any:
    from registry import AdapterRegistry

    return AdapterRegistry.from_settings(settings)


def _registered_models(registry: Any, tenants: set[str]) -> set[str]:
    """Names of the registered models of these tenants: one paged search per tenant, so a first
    run of a big manifest does not look every person up on its own."""
    from registry import MODEL_PREFIX

    names: set[str] = set()
    client = registry.models.client
    for tenant in sorted(tenants):
        token = None
        while True:
            page = client.search_registered_models(
                filter_string=f"name LIKE '{MODEL_PREFIX}.{tenant}.%'",
                max_results=1000,
                page_token=token,
            )
            names.update(m.name for m in page)
            token = page.token
            if not token:
                break
    return names


class _Registered:
    """Finds what a job key already produced: the index row, or else the registered MLflow version
    (a crash between registration and the index write), whose missing index rows
    :meth:`repair` writes."""

    def __init__(self, registry: Any, tenants: set[str]) -> None:
        self.registry = registry
        self.indexed = {(e.tenant, e.identity): e for t in sorted(tenants) for e in registry.index.list(t)}
        self.known = _registered_models(registry, tenants)
        self.repairs: list[Any] = []

    def find(self, tenant: str, identity: str, job_key: str) -> Any:
        """The :class:`registry.IndexEntry` of this person's adapter for ``job_key``, or None."""
        from registry import entry_of_version, model_name

        entry = self.indexed.get((tenant, identity))
        if entry is not None and entry.job_key == job_key:
            return entry
        if model_name(tenant, identity) not in self.known:  # never registered: nothing to look up
            return None
        found = self.registry.models.find_version(tenant, identity, job_key)
        if found is None:
            return None
        registered = entry_of_version(tenant, identity, found)
        if entry is None or entry.version < found.version:  # registered, never indexed
            self.repairs.append(registered)
        return registered

    def repair(self) -> int:
        """Write the index rows :meth:`find` found missing; returns how many."""
        if self.repairs:
            self.registry.index.upsert(self.repairs)
        n, self.repairs = len(self.repairs), []
        return n


def recover_published(settings: Any, jobs: list[PersonJob]) -> tuple[dict[str, Any], int]:
    """After the job queue was lost: which jobs made it into the registry (job id -> index entry),
    with the index rows of any registered but not yet indexed written now; and how many."""
    lookup = _Registered(_registry(settings), {j.tenant for j in jobs})
    found = {j.job_id: e for j in jobs if (e := lookup.find(j.tenant, j.identity, j.job_key)) is not None}
    return found, lookup.repair()


def prepare_run(
    manifest_url: str,
    settings: Any = None,
    *,
    quarantine_out: str | None = None,
    dry_train: bool = False,
    run_id: str | None = None,
    **overrides: Any,
) -> RunPlan:
    """Validate the manifest, write the quarantine, compute job keys, find what is registered.

    ``overrides``: :class:`pfstorer.settings.Settings` fields (``base``, ``store_url``,
    ``tracking_uri``, ``index_url``, ``storage_options``, ``state_dir``, ``workers``...) and
    ``steps``. Validation runs on Ray Data: Ray is joined or started here (and, if started here,
    shut down by :func:`execute_run`); the base's fingerprint is read from its weights' header
    (:func:`pfstorer.model.base_fingerprint`), so the driver never holds the weights.
    """
    from pfstorer.model import base_fingerprint
    from pfstorer.prior import planned_prior_sha256
    from pipelines.manifest import manifest_hash
    from pipelines.validate import validate_from_settings, write_quarantine

    t_start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    settings = _make_settings(settings, overrides)
    if dry_train:
        check_dry_train_registry(settings)
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    opts = storage_options_of(settings)
    timings: dict[str, float] = {}

    # validate (on Ray Data)
    t0 = time.perf_counter()
    owns_ray = ensure_ray(settings)
    try:
        if cluster_address(settings):
            check_capacity(settings)  # a cluster that starts with a 0-CPU head grows first
        validation = validate_from_settings(manifest_url, settings)
    except BaseException:
        if owns_ray:
            shutdown_ray()
        raise
    table = validation.manifest
    qurl = quarantine_out or str(
        Path(settings.state_dir) / "runs" / run_id / "quarantine.parquet"
    )
    write_quarantine(validation, qurl, opts)
    timings["validate_s"] = time.perf_counter() - t0

    # job keys, skips
    t0 = time.perf_counter()
    base_config, fingerprint = base_fingerprint(settings.base, weights=settings.base_weights)
    preset, licence = base_config.name, str(getattr(base_config, "license", ""))
    config = settings.personalize
    key_config = config.model_dump(mode="json")
    # the prior by content, not by name: a retrained prior beside the base retrains people
    key_config["prior"] = planned_prior_sha256(settings.base, settings.base_weights, fingerprint, config.prior)
    if dry_train:
        key_config["dry_train"] = True
    lookup = _Registered(_registry(settings), {t for t, _ in validation.jobs})
    todo: list[PersonJob] = []
    skipped: list[IdentityOutcome] = []
    for (tenant, identity), job in validation.jobs.items():
        key = job.job_key(fingerprint, key_config)
        entry = lookup.find(tenant, identity, key)
        if entry is not None:
            skipped.append(
                IdentityOutcome(
                    tenant=tenant, identity=identity, status="skipped", job_key=key,
                    version=entry.version, uri=entry.uri, sha256=entry.sha256,
                )
            )
            continue
        refs = tuple(RefPhoto(r["uri"], r["sha256"]) for r in job.refs)
        todo.append(PersonJob(f"{len(todo):06d}", tenant, identity, key, refs))
    repaired = lookup.repair()
    timings["plan_s"] = time.perf_counter() - t0
    timings["prepare_s"] = time.perf_counter() - t_start
    return RunPlan(
        run_id=run_id, settings=settings, manifest_url=str(manifest_url),
        manifest_hash=manifest_hash(table), rows=table.num_rows, config=config,
        key_config=key_config, base_fingerprint=fingerprint, base_preset=preset,
        base_licence=licence, validation=validation, quarantine_url=qurl, todo=todo,
        skipped=skipped, index_repaired=repaired, dry_train=dry_train,
        started_at=started_at, timings=timings, owns_ray=owns_ray,
    )

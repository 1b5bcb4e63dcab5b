"""``pfstorer run``: a manifest in, one registered adapter per person out.

validate -> plan (job keys, skip what is registered) -> train on a Ray Train worker group ->
publish (store, MLflow, index) -> summary. Python API::

    from pipelines.run import run_manifest
    summary = run_manifest("s3://bucket/manifest.parquet", base="tiny", steps=2, workers=2)
    print(summary.table())

:func:`prepare_run` (validate on Ray Data + plan) and :func:`execute_run` (train + publish) are the two
halves of :func:`run_manifest`.

- **Validate first**: bad rows go to the quarantine Parquet (``--quarantine-out``, default
  ``{state_dir}/runs/{run_id}/quarantine.parquet``); quarantined people never reach training.
- **Idempotent**: each person's job key is ``hash(reference sha256s, base fingerprint, training
  config)``. A person whose key is already in the index (or registered in MLflow: a crash between
  registration and index write is repaired here) is *skipped*; if nobody is left, Ray Train is not
  even started. Packing, worker count and retries are not part of the key: they do not change
  what an identity learns.
- **Train**: see :mod:`pipelines.scheduler` (job queue actor, long-lived workers with the frozen
  base loaded once, packed multi-identity batches, one publisher for MLflow and the index,
  ``FailureConfig`` restarts that re-queue only the lost workers' people).
- **Summary**: a progress bar while training (stderr), a table at the end (done, skipped, failed,
  quarantined, time per identity) and :class:`RunSummary` as JSON in
  ``{state_dir}/runs/{run_id}/summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pipelines.cluster import check_capacity, cluster_address, ensure_ray

log = logging.getLogger(__name__)

__all__ = [
    "IdentityOutcome",
    "RunPlan",
    "RunSummary",
    "execute_run",
    "prepare_run",
    "register_cli",
    "run_manifest",
]

_SETTINGS_FIELDS = (
    "state_dir", "base", "base_weights", "store_url", "index_url", "tracking_uri", "registry_uri",
    "storage_options", "ray_address", "workers", "cpus_per_worker", "gpus_per_worker", "max_retries",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


class IdentityOutcome(BaseModel):
    """What happened to one person that passed validation."""

    tenant: str
    identity: str
    status: str  # done | skipped | failed
    job_key: str
    version: int | None = None
    uri: str | None = None
    sha256: str | None = None
    attempts: int = 0
    error: str | None = None
    train_s: float | None = None  # lease -> adapter ready, in a worker (packed: shared steps)
    upload_s: float | None = None  # save + store write + sha256 verify, in the worker
    publish_s: float | None = None  # MLflow run + registration, in the publisher
    worker: str | None = None


class RunSummary(BaseModel):
    """The outcome of one ``pfstorer run`` (written as JSON to the state directory)."""

    run_id: str
    manifest: str
    manifest_hash: str
    base: str
    base_fingerprint: str
    config: dict[str, Any]
    dry_train: bool = False
    started_at: str
    finished_at: str = ""
    rows: int = 0
    people: int = Field(0, description="people that passed validation")
    done: int = 0
    skipped: int = 0
    failed: int = 0
    quarantined_people: int = 0
    quarantined_rows: int = 0
    quarantine_reasons: dict[str, int] = Field(default_factory=dict)
    quarantine_url: str | None = None
    trained: int = Field(0, description="adapters trained by this run (handed to the publisher)")
    versions_created: int = Field(0, description="new MLflow model versions")
    index_repaired: int = 0
    workers: int = 1
    pack: int = 1
    worker_restarts: int = 0
    requeued_after_loss: int = 0
    train_error: str | None = None
    ray_train: dict[str, Any] = Field(default_factory=dict)
    publisher: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    identities: list[IdentityOutcome] = Field(default_factory=list)
    summary_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.train_error is None

    def by_status(self, status: str) -> list[IdentityOutcome]:
        return [o for o in self.identities if o.status == status]

    def table(self) -> str:
        """The human summary printed at the end of a run."""
        lines = [
            f"pfstorer run {self.run_id}: {self.manifest} ({self.rows} rows, "
            f"hash {self.manifest_hash[:12]})",
            f"base {self.base} ({self.base_fingerprint[:12]}), steps "
            f"{self.config.get('steps')}{' (dry train)' if self.dry_train else ''}, "
            f"{self.workers} worker(s) x pack {self.pack}",
            "",
            f"  {'people':>8} {'done':>6} {'skipped':>8} {'failed':>7} {'quarantined':>12}"
            f" {'(rows)':>7}",
            f"  {self.people:>8} {self.done:>6} {self.skipped:>8} {self.failed:>7}"
            f" {self.quarantined_people:>12} {self.quarantined_rows:>7}",
            "",
        ]
        t = self.timings
        lines.append(
            "time: "
            + ", ".join(
                f"{k} {t[k]:.1f} s"
                for k in ("validate_s", "plan_s", "train_s", "total_s")
                if k in t
            )
        )
        done = self.by_status("done")
        if done:

            def med(vals: list[float | None]) -> str:
                v = [x for x in vals if x is not None]
                return f"{statistics.median(v):.2f} s" if v else "-"

            lines.append(
                f"per identity (median): train {med([o.train_s for o in done])}, upload "
                f"{med([o.upload_s for o in done])}, register {med([o.publish_s for o in done])}; "
                f"wall {t.get('train_s', 0.0) / max(len(done), 1):.2f} s per trained identity"
            )
        if self.worker_restarts:
            lines.append(
                f"worker group restarts: {self.worker_restarts} "
                f"({self.requeued_after_loss} leased people put back in the queue)"
            )
        if self.quarantine_reasons:
            lines.append(f"quarantine ({self.quarantine_url}):")
            lines += [f"  {n:6d}  {r}" for r, n in self.quarantine_reasons.items()]
        failed = self.by_status("failed")
        if failed:
            lines.append("failed:")
            lines += [f"  {o.tenant}/{o.identity}: {o.error}" for o in failed]
        if self.train_error:
            lines.append(f"training stopped: {self.train_error}")
        if self.summary_path:
            lines.append(f"summary: {self.summary_path}")
        return "\n".join(lines)


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
    todo: list[dict[str, Any]]  # queue jobs: job_id, tenant, identity, job_key, refs
    skipped: list[IdentityOutcome]
    index_repaired: int
    dry_train: bool
    started_at: str
    timings: dict[str, float]
    owns_ray: bool = False  # prepare_run started Ray; execute_run shuts it down

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.state_dir) / "runs" / self.run_id


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


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


def _opts(settings: Any) -> dict[str, Any] | None:
    return dict(settings.storage_options) or None


def _registry(settings: Any) -> Any:
    from registry import AdapterRegistry

    return AdapterRegistry.from_settings(settings)


def _registry_kwargs(settings: Any) -> dict[str, Any]:
    return {
        "store_url": settings.store_url,
        "tracking_uri": settings.tracking_uri,
        "index_url": settings.index_url,
        "registry_uri": settings.registry_uri,
        "storage_options": _opts(settings),
    }


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------


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
    from pipelines.manifest import manifest_hash
    from pipelines.validate import validate_from_settings, write_quarantine
    from registry import IndexEntry, model_name

    t_start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    settings = _make_settings(settings, overrides)
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    opts = _opts(settings)
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
            _shutdown_ray()
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
    if dry_train:
        key_config["dry_train"] = True
    registry = _registry(settings)
    indexed = {(e.tenant, e.identity): e for e in registry.index.list()}
    known = _registered_models(registry, {t for t, _ in validation.jobs})
    todo: list[dict[str, Any]] = []
    skipped: list[IdentityOutcome] = []
    repairs: list[IndexEntry] = []
    for (tenant, identity), job in validation.jobs.items():
        key = job.job_key(fingerprint, key_config)
        entry = indexed.get((tenant, identity))
        if entry is not None and entry.job_key == key:
            skipped.append(
                IdentityOutcome(
                    tenant=tenant, identity=identity, status="skipped", job_key=key,
                    version=entry.version, uri=entry.uri, sha256=entry.sha256,
                )
            )
            continue
        found = None
        if model_name(tenant, identity) in known:  # else: never registered, nothing to look up
            found = registry.models.find_version(tenant, identity, key)
        if found is not None:
            uri = found.tags.get("artifact_uri") or found.source
            sha = found.tags.get("sha256", "")
            skipped.append(
                IdentityOutcome(
                    tenant=tenant, identity=identity, status="skipped", job_key=key,
                    version=found.version, uri=uri, sha256=sha,
                )
            )
            if entry is None or entry.version < found.version:  # registered, never indexed
                repairs.append(
                    IndexEntry(
                        tenant=tenant, identity=identity, version=found.version, uri=uri,
                        sha256=sha, base_fingerprint=found.tags.get("base_fingerprint"),
                        job_key=key, updated_at=datetime.now(UTC),
                    )
                )
            continue
        todo.append(
            {
                "job_id": f"{len(todo):06d}",
                "tenant": tenant,
                "identity": identity,
                "job_key": key,
                "refs": [
                    {"uri": r["uri"], "sha256": r["sha256"]} for r in job.refs
                ],
            }
        )
    if repairs:
        registry.index.upsert(repairs)
    timings["plan_s"] = time.perf_counter() - t0
    timings["prepare_s"] = time.perf_counter() - t_start
    return RunPlan(
        run_id=run_id, settings=settings, manifest_url=str(manifest_url),
        manifest_hash=manifest_hash(table), rows=table.num_rows, config=config,
        key_config=key_config, base_fingerprint=fingerprint, base_preset=preset,
        base_licence=licence, validation=validation, quarantine_url=qurl, todo=todo,
        skipped=skipped, index_repaired=len(repairs), dry_train=dry_train,
        started_at=started_at, timings=timings, owns_ray=owns_ray,
    )


# ---------------------------------------------------------------------------------------------
# execute
# ---------------------------------------------------------------------------------------------


class _Progress:
    """Polls the queue actor while ``fit()`` runs: progress bar + callback."""

    def __init__(
        self,
        queue: Any,
        total: int,
        show: bool,
        callback: Callable[[dict[str, Any]], None] | None,
        interval_s: float = 0.25,
    ) -> None:
        self.queue, self.total, self.callback, self.interval_s = queue, total, callback, interval_s
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, desc="personalize", unit="id", file=sys.stderr,
                            mininterval=0.5 if tty else 10.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pfstorer-progress", daemon=True)
        self.last: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        self._poll()
        if self.bar is not None:
            self.bar.close()

    def _poll(self) -> None:
        import ray

        try:
            snap = ray.get(self.queue.progress.remote(), timeout=10)
        except Exception:
            return
        self.last = snap
        if self.bar is not None:
            settled = snap["done"] + snap["failed"]
            self.bar.update(settled - self.bar.n)
            self.bar.set_postfix(
                leased=snap["leased"], publishing=snap["publishing"], failed=snap["failed"],
                workers=len(snap["workers"]), restarts=snap["restarts"], refresh=False,
            )
        if self.callback is not None:
            try:
                self.callback(snap)
            except Exception:
                log.exception("progress callback failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def execute_run(
    plan: RunPlan,
    *,
    pack: int = 4,
    job_retries: int | None = None,
    report_interval_s: float = 2.0,
    train_storage: str | None = None,
    publish_threads: int | None = None,
    progress: bool = True,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    write_summary: bool = True,
) -> RunSummary:
    """Train and publish ``plan.todo`` on a Ray Train worker group; return the summary.

    ``pack``: people per worker batch. ``job_retries``: retries of a person whose training or
    upload raises (default ``max(settings.max_retries, 0)``, at most 3). ``train_storage``: Ray
    Train's storage path (default ``{state_dir}/ray-train``; on a multi-node cluster use shared
    storage such as ``s3://...``). ``publish_threads``: parallel MLflow writers (default 1 on
    SQLite, 4 for a tracking server). ``on_progress`` gets the queue's progress snapshot (counts,
    current workers with their pids) about four times a second, from a background thread.
    """
    s = plan.settings
    t0 = time.perf_counter()
    outcomes: list[IdentityOutcome] = list(plan.skipped)
    summary = RunSummary(
        run_id=plan.run_id, manifest=plan.manifest_url, manifest_hash=plan.manifest_hash,
        base=plan.base_preset, base_fingerprint=plan.base_fingerprint, config=plan.key_config,
        dry_train=plan.dry_train, started_at=plan.started_at, rows=plan.rows,
        people=len(plan.validation.jobs), quarantine_url=plan.quarantine_url,
        quarantined_rows=plan.validation.quarantine.num_rows,
        quarantine_reasons=plan.validation.reason_counts(), index_repaired=plan.index_repaired,
        workers=s.workers, pack=pack,
    )
    q = plan.validation.quarantine
    bad_people = set(zip(q.column("tenant").to_pylist(), q.column("identity").to_pylist(), strict=True))
    summary.quarantined_people = len(bad_people - set(plan.validation.jobs))

    try:
        if plan.todo:
            _train(plan, summary, outcomes, pack=pack, job_retries=job_retries,
                   report_interval_s=report_interval_s, train_storage=train_storage,
                   publish_threads=publish_threads, progress=progress, on_progress=on_progress)
    finally:
        if plan.owns_ray:
            _shutdown_ray()
    summary.timings = {**plan.timings, "train_s": time.perf_counter() - t0}
    summary.timings["total_s"] = summary.timings["prepare_s"] + summary.timings["train_s"]
    order = {k: i for i, k in enumerate(plan.validation.jobs)}
    outcomes.sort(key=lambda o: order.get((o.tenant, o.identity), 1 << 30))
    summary.identities = outcomes
    summary.done = sum(o.status == "done" for o in outcomes)
    summary.skipped = sum(o.status == "skipped" for o in outcomes)
    summary.failed = sum(o.status == "failed" for o in outcomes)
    summary.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    if write_summary:
        path = plan.run_dir / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary.summary_path = str(path)
        path.write_text(summary.model_dump_json(indent=2))
        (Path(s.state_dir) / "runs" / "latest.json").write_text(summary.model_dump_json(indent=2))
    return summary


def _train(
    plan: RunPlan,
    summary: RunSummary,
    outcomes: list[IdentityOutcome],
    *,
    pack: int,
    job_retries: int | None,
    report_interval_s: float,
    train_storage: str | None,
    publish_threads: int | None,
    progress: bool,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.scheduler import make_job_queue, train_loop
    from pipelines.validate import limits_from_settings

    s = plan.settings
    started_ray = ensure_ray(s)
    if job_retries is None:
        job_retries = min(max(s.max_retries, 0), 3)
    try:
        if started_ray or plan.owns_ray or cluster_address(s):
            check_capacity(s)
        lineage = {
            "manifest_uri": plan.manifest_url,
            "manifest_hash": plan.manifest_hash,
            "base_preset": plan.base_preset,
            "base_licence": plan.base_licence,
            "pipeline_run": plan.run_id,
        }
        if plan.dry_train:
            lineage["dry_train"] = "true"
        params = {
            "base": plan.base_preset, "base_fingerprint": plan.base_fingerprint,
            "config": plan.key_config, "manifest_uri": plan.manifest_url,
            "manifest_hash": plan.manifest_hash, "pack": pack, "pipeline_run": plan.run_id,
        }
        queue = make_job_queue(
            plan.todo, _registry_kwargs(s), lineage=lineage, params=params,
            job_retries=job_retries, report_interval_s=report_interval_s,
            publish_threads=publish_threads,
        )
        use_gpu = s.gpus_per_worker > 0
        resources: dict[str, float] = {"CPU": s.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = s.gpus_per_worker
        cfg = {
            "queue": queue,
            "base": s.base,
            "base_weights": s.base_weights,
            "base_fingerprint": plan.base_fingerprint,
            "config": plan.config.model_dump(mode="json"),
            "pack": pack,
            "train_speed": s.train_speed.model_dump(),
            "store_url": s.store_url,
            "storage_options": _opts(s),
            "limits": limits_from_settings(s.limits),
            "use_gpu": use_gpu,
            "dry_train": plan.dry_train,
        }
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(
                num_workers=s.workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=f"pfstorer-{plan.run_id}",
                storage_path=train_storage or str(Path(s.state_dir) / "ray-train"),
                failure_config=FailureConfig(max_failures=s.max_retries),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        with _Progress(queue, len(plan.todo), progress, on_progress):
            try:
                result = trainer.fit()
                summary.ray_train = {
                    "metrics": dict(result.metrics or {}),
                    "checkpoint": result.checkpoint.path if result.checkpoint else None,
                    "path": getattr(result, "path", None),
                }
            except Exception as exc:  # the group failed more than max_retries times
                log.error("Ray Train stopped: %s", exc)
                summary.train_error = _last_error_line(exc)
        ray.get(queue.close.remote())
        out = ray.get(queue.outcome.remote())
        ray.kill(queue)
    finally:
        if started_ray:
            ray.shutdown()
    summary.worker_restarts = out["restarts"]
    summary.requeued_after_loss = out["requeued_after_loss"]
    summary.publisher = out["publisher"]
    summary.ray_train.update(rounds=out["rounds"], steps=out["steps"])
    for job in out["jobs"].values():
        status = job["status"]
        error = None
        if status != "done":
            errors = job["errors"] or [f"not finished ({status}): the worker group stopped"]
            error, status = errors[-1], "failed"
        else:
            summary.versions_created += 1
        if "uri" in job:
            summary.trained += 1
        outcomes.append(
            IdentityOutcome(
                tenant=job["tenant"], identity=job["identity"], status=status,
                job_key=job["job_key"], version=job.get("version"), uri=job.get("uri"),
                sha256=job.get("sha256"), attempts=job["attempts"], error=error,
                train_s=job.get("train_s"), upload_s=job.get("upload_s"),
                publish_s=job.get("publish_s"), worker=job.get("worker"),
            )
        )


def _last_error_line(exc: BaseException) -> str:
    """The last ``SomeError: message`` line of a (worker) traceback, or the first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return ln[:500]
    return (lines[0] if lines else type(exc).__name__)[:500]


def run_manifest(
    manifest_url: str,
    settings: Any = None,
    *,
    pack: int = 4,
    quarantine_out: str | None = None,
    dry_train: bool = False,
    job_retries: int | None = None,
    report_interval_s: float = 2.0,
    train_storage: str | None = None,
    publish_threads: int | None = None,
    progress: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    run_id: str | None = None,
    **overrides: Any,
) -> RunSummary:
    """Validate, plan, train and publish a manifest; see the module docstring.

    ``settings``: a :class:`pfstorer.settings.Settings` (default ``Settings.load()``);
    ``overrides``: any of its fields (``base``, ``store_url``, ``tracking_uri``, ``index_url``,
    ``storage_options``, ``ray_address``, ``workers``, ``cpus_per_worker``, ``gpus_per_worker``,
    ``max_retries``, ``state_dir``) and ``steps``. ``dry_train``: skip the UNet (adapters of the
    real shapes, untrained) - for benchmarks of the scheduler; its job keys differ from real ones.
    """
    plan = prepare_run(
        manifest_url, settings, quarantine_out=quarantine_out, dry_train=dry_train,
        run_id=run_id, **overrides,
    )
    return execute_run(
        plan, pack=pack, job_retries=job_retries, report_interval_s=report_interval_s,
        train_storage=train_storage, publish_threads=publish_threads, progress=progress,
        on_progress=on_progress,
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from pfstorer.cli import stdout_to_stderr
    from pfstorer.errors import PFStorerError
    from pfstorer.settings import Settings

    with stdout_to_stderr(args.json):
        try:
            settings = Settings.load(
                args.config,
                state_dir=args.state_dir, base=args.base, base_weights=args.base_weights,
                store_url=args.store, tracking_uri=args.tracking_uri, index_url=args.index,
                ray_address=args.ray_address, workers=args.workers,
                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                max_retries=args.max_retries,
            )
            if args.s3_endpoint_url:
                settings.storage_options = {**settings.storage_options, "endpoint_url": args.s3_endpoint_url}
            summary = run_manifest(
                args.manifest, settings, steps=args.steps, pack=args.pack,
                quarantine_out=args.quarantine_out, dry_train=args.dry_train,
                train_storage=args.train_storage, progress=not args.no_progress and not args.json,
            )
        except PFStorerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        print(summary.table())
    return 0 if summary.ok else 1


def register_cli(subparsers: Any) -> None:
    """Add ``run`` to ``pfstorer``'s sub-commands."""
    p = subparsers.add_parser(
        "run",
        help="personalize every person of a manifest on Ray and register the adapters",
        description="Validate a manifest (bad rows to quarantine), skip people whose adapter for "
        "the same photos, base and config is registered, train the rest on a Ray Train worker "
        "group (frozen base loaded once per worker, people packed into batches, pulled from a "
        "queue), register each adapter in MLflow and the index, and print a summary. Exit code "
        "0: everyone done or skipped; 1: someone failed; 2: a user error. Defaults come from "
        "pfstorer's settings (PFSTORER_* environment, --config file, local state dir).",
    )
    from pfstorer.settings import Settings

    d = {name: f.default for name, f in Settings.model_fields.items()}  # help shows the real defaults
    p.add_argument("--manifest", required=True, metavar="URL", help="Parquet manifest (fsspec URL)")
    p.add_argument("--base", help=f"base preset or checkpoint (settings: base, {d['base']})")
    p.add_argument("--base-weights", metavar="URL", help="weights for the preset (sd21)")
    p.add_argument("--store", metavar="URL", help="artifact store (default {state_dir}/adapters)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow (default sqlite in the state dir)")
    p.add_argument("--index", metavar="URL", help="adapter index (default {state_dir}/index.parquet)")
    p.add_argument("--steps", type=int, help="personalization steps per person (settings: personalize.steps, "
                   f"{Settings.model_fields['personalize'].default_factory().steps})")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--workers", type=int, help=f"Ray Train workers (settings: workers, {d['workers']})")
    p.add_argument("--pack", type=int, default=4, help="people trained together per worker (4)")
    p.add_argument("--cpus-per-worker", type=float, help=f"CPUs per worker (settings: cpus_per_worker, {d['cpus_per_worker']:g})")
    p.add_argument("--gpus-per-worker", type=float, help=f"GPUs per worker (settings: gpus_per_worker, {d['gpus_per_worker']:g})")
    p.add_argument("--max-retries", type=int, help="worker-group restarts; also per-person retries "
                   f"(settings: max_retries, {d['max_retries']})")
    p.add_argument("--quarantine-out", metavar="URL", help="quarantine Parquet (default in the run's state dir)")
    p.add_argument("--train-storage", metavar="URL", help="Ray Train storage (default {state_dir}/ray-train)")
    p.add_argument("--state-dir", metavar="DIR", help="local state (default .pfstorer-state)")
    p.add_argument("--config", metavar="FILE", help="pfstorer settings file (YAML/TOML)")
    p.add_argument("--s3-endpoint-url", metavar="URL", help="S3 endpoint for s3:// URLs")
    p.add_argument("--dry-train", action="store_true", help="skip the UNet (scheduler benchmarks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.run")
    register_cli(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(["run", *sys.argv[1:]]))

"""The second half of ``pfstorer run``: train the plan on a Ray Train worker group, publish,
and sum it up.

The driver starts the :mod:`pipelines.job_queue` actor, a ``TorchTrainer`` whose workers run
:func:`pipelines.train_worker.train_loop`, and a progress bar that polls the queue; when
``fit()`` returns it closes the queue (its publisher drains) and turns every job's record into an
:class:`~pipelines.run_summary.IdentityOutcome`. If the queue actor died, its records died with
it: the registry then tells who was published, and anyone registered but not yet indexed is
indexed before the summary is written.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.cluster import check_capacity, cluster_address, ensure_ray, shutdown_ray
from pipelines.records import QueueProgress
from pipelines.run_plan import RunPlan, recover_published, storage_options_of
from pipelines.run_summary import IdentityOutcome, RunSummary

log = logging.getLogger(__name__)

__all__ = ["execute_run"]


class _Progress:
    """Polls the queue actor while ``fit()`` runs: progress bar + callback."""

    def __init__(
        self,
        queue: Any,
        total: int,
        show: bool,
        callback: Callable[[QueueProgress], None] | None,
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
        self.last: QueueProgress | None = None

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
            self.bar.update(snap.done + snap.failed - self.bar.n)
            self.bar.set_postfix(
                leased=snap.leased, publishing=snap.publishing, failed=snap.failed,
                workers=len(snap.workers), restarts=snap.restarts, refresh=False,
            )
        if self.callback is not None:
            try:
                self.callback(snap)
            except Exception:
                log.exception("progress callback failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()


def execute_run(
    plan: RunPlan,
    *,
    pack: int = 4,
    job_retries: int | None = None,
    report_interval_s: float = 2.0,
    train_storage: str | None = None,
    publish_threads: int | None = None,
    progress: bool = True,
    on_progress: Callable[[QueueProgress], None] | None = None,
    write_summary: bool = True,
) -> RunSummary:
    """Train and publish ``plan.todo`` on a Ray Train worker group; return the summary.

    ``pack``: people per worker batch. ``job_retries``: retries of a person whose training or
    upload raises (default ``max(settings.max_retries, 0)``, at most 3). ``train_storage``: Ray
    Train's storage path (default ``{state_dir}/ray-train``; on a multi-node cluster use shared
    storage such as ``s3://...``). ``publish_threads``: parallel MLflow writers (default 1 on
    SQLite, 8 for a tracking server). ``on_progress`` gets the queue's :class:`~pipelines.records.QueueProgress` (counts,
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
            shutdown_ray()
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
    on_progress: Callable[[QueueProgress], None] | None,
) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.job_queue import make_job_queue
    from pipelines.train_worker import WorkerConfig, train_loop

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
            plan.todo, s, lineage=lineage, params=params,
            job_retries=job_retries, report_interval_s=report_interval_s,
            publish_threads=publish_threads,
        )
        use_gpu = s.gpus_per_worker > 0
        resources: dict[str, float] = {"CPU": s.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = s.gpus_per_worker
        worker = WorkerConfig(
            queue=queue, base=s.base, base_weights=s.base_weights, base_fingerprint=plan.base_fingerprint,
            config=plan.config.model_dump(mode="json"), store_url=s.store_url, pack=pack,
            train_speed=s.train_speed.model_dump(), storage_options=storage_options_of(s),
            limits=s.limits.references(), use_gpu=use_gpu, dry_train=plan.dry_train,
            snapshot_interval_s=s.snapshot_interval_s,
        )
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"worker": worker},
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
        with _Progress(queue, len(plan.todo), progress, on_progress) as watch:
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
        try:
            ray.get(queue.close.remote())
            out = ray.get(queue.outcome.remote())
            ray.kill(queue)
        except ray.exceptions.RayActorError as exc:
            out, lost = None, _last_error_line(exc)
    finally:
        if started_ray:
            ray.shutdown()
    if out is None:
        _after_queue_loss(plan, summary, outcomes, watch.last, lost)
        return
    summary.worker_restarts = out.restarts
    summary.requeued_after_loss = out.requeued_after_loss
    summary.resumed_after_loss = out.resumed_after_loss
    summary.publisher = out.publisher
    summary.ray_train.update(rounds=out.rounds, steps=out.steps)
    for rec in out.records.values():
        status, error = rec.status, None
        if status != "done":
            errors = rec.errors or [f"not finished ({status}): the worker group stopped"]
            error, status = errors[-1], "failed"
        else:
            summary.versions_created += 1
        stored = rec.stored
        if stored is not None:
            summary.trained += 1
        job = rec.job
        outcomes.append(
            IdentityOutcome(
                tenant=job.tenant, identity=job.identity, status=status, job_key=job.job_key,
                version=rec.version, uri=stored and stored.uri, sha256=stored and stored.sha256,
                attempts=rec.attempts, error=error, train_s=stored and stored.train_s,
                upload_s=stored and stored.upload_s, publish_s=rec.publish_s, worker=rec.worker,
            )
        )


def _after_queue_loss(
    plan: RunPlan, summary: RunSummary, outcomes: list[IdentityOutcome], last: QueueProgress | None, error: str
) -> None:
    """The queue actor died with every job's record: ask the registry who was published."""
    found, repaired = recover_published(plan.settings, plan.todo)
    log.error("the job queue was lost (%s): %d of %d people were registered, %d index rows written now",
              error, len(found), len(plan.todo), repaired)
    summary.queue_lost = True
    summary.train_error = (f"the job queue actor was lost ({error}); {len(found)} of {len(plan.todo)} people "
                           f"had been registered (all are indexed), run the manifest again for the rest")
    summary.index_repaired += repaired
    summary.trained = summary.versions_created = len(found)
    if last is not None:
        summary.worker_restarts = last.restarts
        summary.requeued_after_loss = last.requeued_after_loss
        summary.resumed_after_loss = last.resumed_after_loss
    for job in plan.todo:
        entry = found.get(job.job_id)
        outcomes.append(
            IdentityOutcome(
                tenant=job.tenant, identity=job.identity, job_key=job.job_key,
                status="done" if entry else "failed", version=entry and entry.version,
                uri=entry and entry.uri, sha256=entry and entry.sha256, attempts=1 if entry else 0,
                error=None if entry else "not finished: the job queue was lost",
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
